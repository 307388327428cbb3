"""The docker runtime kind: ``driver`` (online deploys), ``hosting`` (the shared host
container), ``batch``, ``streaming``, ``containers`` (names, labels, sockets, options),
``engine`` (the connection) and ``images`` (model images); ``kind`` registers it. Import
the modules: this package re-exports nothing, so the gateway can import its parts without
loading the driver."""
