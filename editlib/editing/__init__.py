"""The locate-and-edit engine shared by ROME, r-ROME, MEMIT, EMMET and AlphaEdit: keys, target
values, context templates, second-moment statistics, the closed-form update rules and the
`Editor` session that applies them."""
