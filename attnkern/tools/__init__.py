"""The command-line tools around the library: `attnkern check | bench | train` (cli.py) and
the data sets of `train`. They import the library; the library never imports them."""
