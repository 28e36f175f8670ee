"""Methods and brick kinds that later work implements: they parse and resolve today."""
from cfmlang.stdlib.registry import planned

planned("grow", "moe", "the merge issue (mergekit-moe)")
