"""The cfmlang grammar and parser."""
from cfmlang.grammar.parser import parse_tree

__all__ = ["parse_tree"]
