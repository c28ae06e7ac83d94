-- A card update makes its payment method's scheduled recoveries due at once (issue 13): found
-- by merchant and payment method, among the few payments under a scheduled recovery.
CREATE INDEX payments_recovery_by_payment_method ON payments (merchant_id, payment_method)
    WHERE recovery = 'scheduled';
