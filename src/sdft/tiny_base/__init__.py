"""The learned tiny base `tiny_qd` (issue 20): its parts, each trained by sdft on QuickDraw."""
