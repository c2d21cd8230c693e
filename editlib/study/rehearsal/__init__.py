"""The rehearsal: a paper config's whole workflow on CPU, with local stand-ins for what only the
network provides (editlib.study.rehearsal.run; `make rehearse CONFIG=configs/<paper config>.yaml`)."""
