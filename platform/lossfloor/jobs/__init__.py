"""Jobs: the one way commands and studies run work, locally or on Ray (ARCHITECTURE.md).

    jobs.engine     where work runs: the one validated `Engine` (local | ray) and its flags
    jobs.tracking   the MLflow store a job logs to, opened before any work
    jobs.estimate   J*(σ) of a data set on the local engine or Ray Data, resumable from a work folder
    jobs.stages     hash-addressed stage folders (DONE.json written last): a rerun skips finished work
    jobs.study      a study's stages declared as data and the one runner that skips, runs and logs them
    jobs.train      one model, or a ladder of models, in this process, as Ray tasks or on Ray Train
    jobs.sweep      a Ray Tune sweep of the optimal-loss schedule from command-line style arguments
    jobs.diagnose   a model diagnosed against J* from flags
    jobs.dashboard  a study's (or the diagnosed models') page, read back from MLflow
    jobs.record     the figures drawn (pages) and handed finished to MLflow (tracking)
    jobs.samples    a samples grid of a training checkpoint
    jobs.encode     images -> VAE latents (locally or on Ray Data, resumable) and latents -> PNGs

A command (`lossfloor.cli`) or a study (`studies/`) parses its flags, builds configs and calls a job, never
an adapter; a job imports Ray only in its Ray branch, and `lossfloor.ray` / `lossfloor.tracking` /
`lossfloor.pages` adapt the core for it.
"""
