"""Lightning callbacks of phi2tutor, one per file; thin wrappers over the analysis in phi2tutor/."""
