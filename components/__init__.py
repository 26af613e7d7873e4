"""TFX module code. This folder holds only the module file: TFX packages every .py beside
a module file into a wheel for each component run."""
