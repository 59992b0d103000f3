"""The inference pool: engine core (native scheduler, allocator, batch builder) and service."""
