"""One module per ``peftplan`` subcommand, each with ``add(sub)`` (its parser) and the function
that runs it; `arguments` holds the flags several commands share, defined once."""
