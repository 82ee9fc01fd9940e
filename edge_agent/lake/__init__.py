"""The catalogue side: where the lake records DIDs, replicas and requested copies."""
