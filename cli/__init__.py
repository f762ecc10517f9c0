"""The ``lorakit`` command line (installed as ``lorakit.cli``)."""
