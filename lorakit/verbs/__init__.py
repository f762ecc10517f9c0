"""The verbs: one module per command, each the load → plan → stream → save → report of that command.

A verb turns paths and options into a written file and a :class:`~lorakit.report.Report`: it resolves its inputs
(``hf://`` specs through :mod:`lorakit.hub`), reads headers, plans from them (refusing bad input before anything
is computed or written), streams modules through a pure operator from :mod:`lorakit.ops` or :mod:`lorakit.quant`,
writes atomically through :mod:`lorakit.formats` / :mod:`lorakit.io`, and reports. Operators never do file I/O;
the CLI (``lorakit.cli.commands``) and :mod:`lorakit.api` call the verbs. See ``docs/architecture.md``.

Modules are imported on demand (``from lorakit.verbs.resize import resize_file``): this package imports nothing.
"""
