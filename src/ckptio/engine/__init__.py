"""One engine for every world size: ranks and collectives, the plan, writing, reading, the commit of a save."""
