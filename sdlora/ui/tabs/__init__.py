"""One module per tab of the page: its layout and the wiring of its buttons to the UI's work modules."""
