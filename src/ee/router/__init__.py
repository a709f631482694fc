"""The cohort router between two CP stacks: the decision (``decision``), guardrails
(``guardrails``) and the self-hosted ``ee-router`` (``server``)."""
