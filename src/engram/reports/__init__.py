"""Reports: tables, figures and summaries of the results files the experiments write.

Reports read results; they may import the libraries and the experiments record types, and
nothing but the CLI imports them.
"""
