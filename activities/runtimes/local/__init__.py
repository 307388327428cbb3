"""The local runtime kind: ``driver`` (online deploys), ``hosting`` (the shared model host),
``batch``, ``streaming``, ``servers`` (model processes), ``packages`` and ``layout`` (its
folders); ``kind`` registers it. Import the modules: this package re-exports nothing, so
the gateway and the registry can import its parts without loading the driver."""
