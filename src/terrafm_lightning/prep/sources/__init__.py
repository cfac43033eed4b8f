"""Input sources that write tiles into a new store: synthetic scenes, GeoTIFFs, Major-TOM."""
