"""Pure mathematics of relexd: estimators, line fits and confidence figures. No file I/O here."""
