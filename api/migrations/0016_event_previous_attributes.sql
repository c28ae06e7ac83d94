-- An `*.updated` event says what changed (Stripe's `data.previous_attributes`): the changed
-- fields' values before the change. Null for every other event. `payment_method.updated` keeps
-- the old masked card (brand, last four, expiry): no card number, as everywhere in the API.
ALTER TABLE events ADD COLUMN previous_attributes jsonb;
