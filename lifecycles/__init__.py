"""Lifecycle definitions, and the authoring API (:mod:`lifecycles.api`) they are written with."""
