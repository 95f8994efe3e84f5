"""Research scripts: screening settings, re-scoring finished runs, serving under load, resuming a
killed run, the README's screenshot. Imported by nothing in the package."""
