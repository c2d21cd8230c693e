"""The editing methods: the registry (torch-free), the session protocol every method implements,
the methods' hyperparameters, and the sessions of the methods that are not locate-and-edit (GRACE, MEND)."""
