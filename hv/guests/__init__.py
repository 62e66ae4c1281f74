"""Host-side knowledge of guests: what hv and the tests need to drive and check them."""
