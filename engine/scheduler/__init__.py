"""Scheduling policies (SLS, ILS, SCLS) behind one pure interface: no I/O, time passed in."""
