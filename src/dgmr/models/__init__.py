"""Models: where they come from (:mod:`.sources`, :mod:`.open`), what each library's look
like (:mod:`.families`), and the dgmr directory they are saved as (:mod:`.artifact`)."""
