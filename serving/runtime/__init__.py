"""The request path apart from HTTP: the Server that wires engine and registry, hot-swap of
alias maps, admission, detokenization with stop strings, routing and residency."""
