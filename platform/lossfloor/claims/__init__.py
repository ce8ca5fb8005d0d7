"""What lossfloor's tools find about the paper's claims: each claim's computation, statistics over seeds
and an honest verdict (`studies/paper_claims.py` runs them; docs/paper-claims.md holds the committed run).

Modules: `seeds` (intervals over seeds, paired differences, verdict words), `estimators` (cDOL's error
against C and the number of queries, and knn's, against the exact estimator on the same queries; paper
Fig. 1c, 4, 5), `survey` (σ* and the plateau J*(∞) of several data sets; Fig. 1d), `report` (the
markdown of docs/paper-claims.md).
"""
