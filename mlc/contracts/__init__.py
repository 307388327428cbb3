"""Activity contracts: each activity's persisted name, input and result in one place.

Workflow code schedules an activity through its contract, workers register the
implementation the contract marks, and the dry run's stand-ins implement the same
contracts, so a call, an implementation or a stand-in that disagrees with the contract
is a type error (strict mypy) instead of a payload that fails to decode at run time.
"""

from mlc.contracts.base import ActivityContract, implementations

__all__ = ["ActivityContract", "implementations"]
