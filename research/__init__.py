"""Training data side: the cohort CSV (`cohort`), cohort feature extraction (`extraction`), a simulated cohort (`simulate`)."""
