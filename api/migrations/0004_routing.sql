-- Per-merchant routing: enabled processors, eligibility rules, fee schedules, cascading.
-- The document's shape is api/services/routing.py's RoutingConfig; a merchant without a row
-- routes everything to psp_a.
CREATE TABLE merchant_routing (
    merchant_id  text PRIMARY KEY REFERENCES merchants (id),
    config       jsonb NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT, UPDATE ON merchant_routing TO tessera_api;
