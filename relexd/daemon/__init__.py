"""``relexd watch``: the long-running, crash-safe daemon beside a live training run.

Modules: :mod:`config` (settings, TOML), :mod:`watcher` (file system events), :mod:`service`
(the scan → ingest → preview loop), :mod:`previews` (which previews to keep), :mod:`hook`
(the ``--on-preview`` command), :mod:`logs` (structlog setup), :mod:`status` and :mod:`cli`.
"""
