-- imfast MySQL/MariaDB schema, version 3.
-- Generated from imfast/backends/mysql.py (MIGRATIONS); MySQLStore.open()
-- applies it by itself. To apply it by hand: mysql im_chat < mysql_schema.sql

CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INT          NOT NULL,
    applied_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (version)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- migration 1: initial schema
CREATE TABLE IF NOT EXISTS messages (
    conv          VARCHAR(130)   NOT NULL,
    seq           BIGINT         NOT NULL,
    msg_id        VARCHAR(64)    NOT NULL,
    sender        VARCHAR(64)    NOT NULL,
    sender_device VARCHAR(64)    NOT NULL,
    cmid          VARCHAR(128)   NOT NULL,
    body          MEDIUMTEXT     NOT NULL,
    ts            BIGINT         NOT NULL COMMENT 'ms since the epoch, server clock',
    kind          VARCHAR(16)    NOT NULL,
    dedup_key     VARBINARY(772) NULL,
    PRIMARY KEY (conv, seq),
    UNIQUE KEY messages_dedup (dedup_key)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE TABLE IF NOT EXISTS private_convs (
    user_id         VARCHAR(64)  NOT NULL,
    conversation_id VARCHAR(130) NOT NULL,
    PRIMARY KEY (user_id, conversation_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE TABLE IF NOT EXISTS device_cursors (
    user_id         VARCHAR(64)  NOT NULL,
    device_id       VARCHAR(64)  NOT NULL,
    conversation_id VARCHAR(130) NOT NULL,
    seq             BIGINT       NOT NULL,
    updated_at      TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
                                 ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (user_id, device_id, conversation_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE TABLE IF NOT EXISTS chat_groups (
    group_id   VARCHAR(64)  NOT NULL,
    name       VARCHAR(512) NOT NULL,
    owner      VARCHAR(64)  NOT NULL,
    created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (group_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE TABLE IF NOT EXISTS group_members (
    group_id VARCHAR(64) NOT NULL,
    user_id  VARCHAR(64) NOT NULL,
    role     VARCHAR(16) NOT NULL,
    PRIMARY KEY (group_id, user_id),
    KEY group_members_user (user_id, group_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE TABLE IF NOT EXISTS read_receipts (
    conversation_id VARCHAR(130) NOT NULL,
    user_id         VARCHAR(64)  NOT NULL,
    seq             BIGINT       NOT NULL,
    updated_at      TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
                                 ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (conversation_id, user_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE TABLE IF NOT EXISTS offline_messages (
    id              BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    user_id         VARCHAR(64)     NOT NULL,
    conversation_id VARCHAR(130)    NOT NULL,
    seq             BIGINT          NOT NULL,
    msg_id          VARCHAR(64)     NOT NULL,
    created_at      TIMESTAMP(3)    NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    UNIQUE KEY offline_user_conv_seq (user_id, conversation_id, seq),
    KEY offline_created_at (created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE TABLE IF NOT EXISTS sequence_snapshots (
    conversation_id VARCHAR(130) NOT NULL,
    seq             BIGINT       NOT NULL,
    updated_at      TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
                                 ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (conversation_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
INSERT IGNORE INTO schema_migrations (version) VALUES (1);

-- migration 2: messages_ts index for MESSAGE_RETENTION_DAYS
SET @imfast_ddl = IF((SELECT COUNT(*) FROM information_schema.statistics WHERE table_schema = DATABASE() AND table_name = 'messages' AND index_name = 'messages_ts') = 0, 'ALTER TABLE messages ADD INDEX messages_ts (ts)', 'DO 0');
PREPARE imfast_ddl FROM @imfast_ddl;
EXECUTE imfast_ddl;
DEALLOCATE PREPARE imfast_ddl;
INSERT IGNORE INTO schema_migrations (version) VALUES (2);

-- migration 3: group_bars: who may not join a group by itself
CREATE TABLE IF NOT EXISTS group_bars (
    group_id VARCHAR(64) NOT NULL,
    user_id  VARCHAR(64) NOT NULL COMMENT '* bars every user: an invite-only group',
    PRIMARY KEY (group_id, user_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
INSERT IGNORE INTO schema_migrations (version) VALUES (3);
