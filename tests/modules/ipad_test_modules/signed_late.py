"""Imported by the signed module on its first ``late`` call, long after LOAD (tests)."""

#: What the signed code answers; a tampered copy answers something else.
MARK = "late"
