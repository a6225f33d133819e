"""Planning: pure numpy decisions (layer codes, activation ranges, branches) that make a Plan."""
