"""Correcting what a model learned: policy-gradient estimators (rl), rollouts, self-correction episodes, SCoRe/RISE objectives (score), the stage driver, and metrics."""
