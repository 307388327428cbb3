"""Activity contracts: each activity's persisted name, input and result in one place.

One module per group (:mod:`~mlc.contracts.inventory`, :mod:`~mlc.contracts.runtime`,
:mod:`~mlc.contracts.traffic`, :mod:`~mlc.contracts.reconcile`,
:mod:`~mlc.contracts.rollback`) holds each activity's name, input, result and
:class:`~mlc.contracts.base.ActivityContract`; :mod:`~mlc.contracts.lifecycle` holds the
lifecycle workflows' inputs, results and queries. Workflow code schedules an activity
through its contract, workers register the implementation the contract marks, and the dry
run's stand-ins implement the same contracts, so a call, an implementation or a stand-in
that disagrees with the contract is a type error (strict mypy) instead of a payload that
fails to decode at run time.

Kept import-free: the CLI reads payload models (:mod:`~mlc.contracts.lifecycle`) without
loading Temporal, which :mod:`~mlc.contracts.base` needs.
"""
