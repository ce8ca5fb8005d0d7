"""docs/paper-claims.md: per claim, the paper's statement, our measurement with its interval, the data,
the command, and the verdict, written from the study's results (the page shows the same numbers)."""

from __future__ import annotations

from collections.abc import Mapping


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(parts: Mapping[str, Mapping], *, command: str, run: Mapping[str, str]) -> str:
    """The page as markdown. parts: {part: {"claims": [claim dicts]}}; run: what ran (date, machine, time)."""
    lines = ["# The paper's claims, tested by lossfloor", "",
             "Every number below comes from one run of `studies/paper_claims.py` (written by it, not by hand):",
             "", f"    {command}", ""]
    lines += [f"- {k}: {v}" for k, v in run.items()]
    lines += ["", "| claim | the paper says | we measured | verdict |", "|---|---|---|---|"]
    claims = [c for part in parts.values() for c in part["claims"]]
    lines += [f"| {_cell(c['claim'])} | {_cell(c['paper'])} | {_cell(c['measured'])} | **{_cell(c['verdict'])}** |"
              for c in claims]
    lines += ["", "## Data of each claim", ""]
    lines += [f"- **{c['claim']}**: {c['data']}" for c in claims]
    lines += ["", "Verdicts: *reproduced* — the paper's direction holds with a 95 % interval that excludes the "
              "opposite; *not reproduced* — the opposite holds with such an interval; *inconclusive at this "
              "scale* — the intervals allow both; *not testable at this scale* — the claim needs what this run "
              "did not have (said in its row).", ""]
    return "\n".join(lines)
