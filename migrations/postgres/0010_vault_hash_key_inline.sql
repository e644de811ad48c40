-- The vault's hash key, fifteen times cheaper (issue 20). The variadic form of
-- 0009 aggregates over `unnest`, which the planner cannot inline: every call ran
-- a subquery (about 15 µs, and an order costs some fifteen calls), so the loader
-- fell behind at 5,000 orders/s and took the CPU the speed layer needed. One
-- function per arity, each a single expression the planner inlines (about 1.5
-- µs). Same bytes as before for the same parts — MD5 of the trimmed parts
-- joined by '||', a NULL part as '' — so rows already loaded keep their keys
-- (the vault test compares with md5() computed apart).
DROP FUNCTION vault.hash_key(VARIADIC text[]);

CREATE FUNCTION vault.hash_key(a text) RETURNS bytea
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT decode(md5(coalesce(trim(a), '')), 'hex') $$;

CREATE FUNCTION vault.hash_key(a text, b text) RETURNS bytea
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT decode(md5(coalesce(trim(a), '') || '||' || coalesce(trim(b), '')), 'hex') $$;

CREATE FUNCTION vault.hash_key(a text, b text, c text) RETURNS bytea
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT decode(md5(coalesce(trim(a), '') || '||' || coalesce(trim(b), '') || '||'
                          || coalesce(trim(c), '')), 'hex')
    $$;

CREATE FUNCTION vault.hash_key(a text, b text, c text, d text) RETURNS bytea
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT decode(md5(coalesce(trim(a), '') || '||' || coalesce(trim(b), '') || '||'
                          || coalesce(trim(c), '') || '||' || coalesce(trim(d), '')), 'hex')
    $$;
