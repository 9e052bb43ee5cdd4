"""The notebooks' side of mfcore: profiles, cached experiment runs, the paper's tables, figures, the query
explorer and statistics, and the teaching demos. Nothing in the paper's core imports from here."""
