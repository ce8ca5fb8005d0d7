"""Pages: every figure and HTML page lossfloor draws, standalone and offline (plotly.js embedded once).

    html       the one page writer (sections, single figures), atomic writes, the offline check
    layout     what every figure shares: powers of ten on every axis, a height that holds the whole legend
    jstar      J*(σ) with its interval and σ*
    scaling    loss vs compute with the envelope, raw vs gap-corrected fits, hold-out predictions, the
               fits table, and the scaling study's dashboard page
    sweep      a schedule sweep's parallel coordinates and objective-vs-images curves
    training   a training run's loss curves

Inputs are the hand-off tables and dicts of the core (J* tables, loss curves, fits.json, sweep rows);
nothing here reads MLflow (`lossfloor.jobs.dashboard` does, then draws with these). Imports plotly; the
core never imports this package.
"""
