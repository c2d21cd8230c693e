"""The studies: config validation and the slice each job reads, the workflow's stages, the experiments,
tidy tables, findings, ablations, figures, the resource plan and the rehearsal of the paper configs."""
