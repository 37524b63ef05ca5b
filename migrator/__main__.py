from migrator.cli import entry

raise SystemExit(entry())
