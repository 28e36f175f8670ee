"""Importers from other tools' formats (mergekit YAML)."""
