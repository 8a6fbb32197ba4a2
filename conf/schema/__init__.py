"""Typed schemas for every config node.

The schema of a node is a dataclass; `runx validate` walks the composed config against these
dataclasses and reports every unknown key, wrong type and bad choice at once. Recipe-specific
sections live in one module per recipe (`runx.conf.schema.<recipe>`), found through RECIPES in
`runx.recipes` — nothing here imports torch.
"""
