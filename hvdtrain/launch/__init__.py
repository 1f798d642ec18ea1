"""Launchers: each turns a spec into a command line and environment that
start `hvdtrain train SPEC` once per rank."""
