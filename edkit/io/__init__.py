"""Readers and writers: CIF structures and PETS2 ``.cif_pets`` datasets."""
