"""The entry points: the command line (``pilm``), its flags and messages, the benchmark and
the scale grid."""
