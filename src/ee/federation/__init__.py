"""Federation: a master CP and datacenter CPs (``ee-cp --role master|dc``).

``pki`` (cluster CA, link certificates), ``wire`` (signed frames and the pure sequence
and snapshot decisions), ``spool`` (the dc's durable outbox), ``master`` and ``dc`` (each
role's supervision subtree), ``routes`` (HTTP), ``metrics`` (per-dc Prometheus series),
``placement`` (the master picks a datacenter: ``choose_target``, intents, outcomes)
and ``reconcile`` (a dc runs the intents of its signed snapshot with today's AppActors).
"""
