"""The front end: grammar, parser, AST and import resolution."""
