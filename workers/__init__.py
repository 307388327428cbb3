"""Workers: wiring clients, pools and activities into Temporal workers."""
