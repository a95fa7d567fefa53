"""Every command-line front end (argparse), each a thin layer over a library module."""
